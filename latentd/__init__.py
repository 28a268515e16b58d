"""latentd: a self-hosted HTTP image-generation service.

This package holds what the API and the workers share (the contract, the Redis
connection settings) and the `latentd` command line. It never imports torch.
"""

__version__ = "0.1.0"
