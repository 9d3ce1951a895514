"""Writers: turn an :class:`~adaconvert.adapter.Adapter` into files other tools load."""

from adaconvert.writers.peft_lora import lora_config_dict, write_peft_lora

__all__ = ["lora_config_dict", "write_peft_lora"]
