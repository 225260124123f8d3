"""Identity adapters by layout: the public IP-Adapter files (public.py: told by their keys, converted to this
pack's layout), their image-prompt projections (projections.py) and the IP-Adapter vocabulary (vocabulary.py:
weight_type, combine_embeds, embeds_scaling). The injector that uses them all is guidance/ip_adapter.py."""
