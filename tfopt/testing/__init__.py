"""Test helpers for tfopt and for people writing their own prunable layers."""

from tfopt.testing.test_case import TestCase

__all__ = ["TestCase"]
