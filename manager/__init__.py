"""The multibot supervisor: runs bots as processes and, when needed, its own Redis."""
