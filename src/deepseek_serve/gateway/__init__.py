"""The gateway role: routes requests over upstream engines (routing, upstreams, proxy)."""
