"""Writers: turn an :class:`~adaconvert.adapter.Adapter` into files other tools load."""

from adaconvert.writers.peft_lora import LAYOUTS, lora_config_dict, write_peft_lora

__all__ = ["LAYOUTS", "lora_config_dict", "write_peft_lora"]
