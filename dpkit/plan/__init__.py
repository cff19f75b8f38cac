"""`dpkit plan`'s model: what fits (memory.py) and what to choose (recommend.py)."""
