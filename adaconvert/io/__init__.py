"""File-level plumbing: locating sources, reading tensors safely, writing safetensors and directories atomically."""
