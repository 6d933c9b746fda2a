"""Training: one loop for finetuning and unlearning, engines (plain torch or DeepSpeed), schedules, checkpoints."""
