"""fedcli: file-based federated learning for banks."""

__version__ = "0.1.0"
