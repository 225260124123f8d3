"""Identity encoders (Omni-ID and its baselines) as plain torch modules; no ComfyUI imports."""
