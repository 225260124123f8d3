"""ComfyUI nodes: omni_id (placeholder until its issue lands)."""
NODES: list = []
