"""Fine-tune a tiny GPT-2 (built from a local config, no download) with ASAM through the
Hugging Face Trainer.

    pip install 'samkit[huggingface]'
    HF_HUB_OFFLINE=1 python examples/huggingface_sam.py
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from samkit.integrations.huggingface import SAMTrainer

if __name__ == "__main__":
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)
    # a toy language: each sequence counts up modulo the vocabulary from a random start
    starts = torch.randint(0, 64, (512, 1))
    ids = (starts + torch.arange(32)) % 64
    train = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir="runs/hf-asam", per_device_train_batch_size=32, max_steps=100,
        learning_rate=1e-3, logging_steps=20, report_to="none", save_strategy="no",
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=train, sam="asam",
                         sam_kwargs={"rho": 0.5, "eta": 0.01})
    print(trainer.train())
