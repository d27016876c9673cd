"""edm-toolkit: the EDM design space (Karras et al. 2022) as interchangeable components."""

__version__ = "0.1.0"
