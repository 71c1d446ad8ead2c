"""Tests of deploy/ and examples/: the manifests, the generated files, the image recipe."""
