"""The P2R pipeline controller: stage 1 → checkpoint → stage 2 → eval, locally or on Kubernetes."""
