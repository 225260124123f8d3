"""ComfyUI nodes: infinite_id (placeholder until its issue lands)."""
NODES: list = []
