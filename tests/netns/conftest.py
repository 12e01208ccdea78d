"""Fixtures for root tests (tests/conftest.py marks everything here ``root``)."""
