"""Preprocessing: turn a portrait, a speech file and emotion text into model conditioning."""
