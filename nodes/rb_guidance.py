"""ComfyUI nodes: rb_guidance (placeholder until its issue lands)."""
NODES: list = []
