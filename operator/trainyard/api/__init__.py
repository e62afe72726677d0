"""The Trainyard API: resources of group ``trainyard.dev``, version ``v1alpha1``."""
