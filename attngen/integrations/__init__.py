"""attngen where other libraries call attention: transformers' attention interface (transformers.py)."""
