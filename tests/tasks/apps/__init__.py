"""Task modules that the tests' worker processes import (`--app tests.tasks.apps.naps:registry`),
and the harness that starts those processes."""
