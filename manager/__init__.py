"""The multibot supervisor: runs bots as processes and, when needed, its own Redis."""

__version__ = "0.1.0"
