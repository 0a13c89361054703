"""`--backend lora`: peft LoRA adapters on a frozen base (torch or fsdp)."""
