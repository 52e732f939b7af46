"""diffdistill: distil diffusers diffusion models into few-step students."""

__version__ = "0.1.0"
