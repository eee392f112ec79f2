"""Datasets on disk: generate, load, validate, export, galleries, and realism against LIDC-IDRI."""
