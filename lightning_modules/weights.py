from fsvideo.checkpoints import load_module_weights, read_state_dict

__all__ = ["load_module_weights", "read_state_dict"]
