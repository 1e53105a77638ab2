"""PRA-GRPO trainer (``p2r.trainer``)."""
