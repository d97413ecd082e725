"""Framework integrations: :mod:`samkit.integrations.lightning` (``pip install
'samkit[lightning]'``) and :mod:`samkit.integrations.huggingface` (``pip install
'samkit[huggingface]'``). Each module imports its framework only when it is imported itself."""
