"""Model services: the vLLM engine layer and the role servers built on it (``p2r.services``)."""
