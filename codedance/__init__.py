"""codedance."""
