"""Encoder model definitions: sentence embedders and cross-encoders, chosen by kind."""
