"""ComfyUI nodes: face_tools (placeholder until its issue lands)."""
NODES: list = []
