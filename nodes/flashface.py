"""ComfyUI nodes: flashface (placeholder until its issue lands)."""
NODES: list = []
