from optim.toy_ascent import TOY

from samkit.optim.registry import register_ascent

register_ascent(TOY)  # the one registry line of a new ascent
