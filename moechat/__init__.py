"""moechat: offline chat for small Mixture-of-Experts language models."""

__version__ = "0.1.0"
