"""Container addresses: which IP and MAC a container gets."""
