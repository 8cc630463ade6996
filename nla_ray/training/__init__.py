"""Training the mini pairs: targets, SFT, GRPO."""
