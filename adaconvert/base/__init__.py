"""The base model an adapter belongs to: its config and adaptable modules, and quantised (QLoRA) bases."""
