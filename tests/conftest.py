"""Shared fixtures: tiny random Llama-family models built from configs (no download)."""
