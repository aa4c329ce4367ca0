"""Fine-tuning on soda-train's run: S2ST translation pairs and document collections (`soda-finetune`)."""
