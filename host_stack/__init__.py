"""host_stack package."""
