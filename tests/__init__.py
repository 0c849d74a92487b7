"""The test suite as a package: tests import their shared helpers as tests.helpers, tests.writers, ..."""
