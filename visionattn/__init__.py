"""visionattn."""
