"""pytest settings for the HTTP-level tests."""


def pytest_configure(config):
    # scripts/test.sh runs `-m "not long"`; scripts/test-long.sh runs `-m long`.
    config.addinivalue_line(
        "markers", "long: minutes-long version of a test; run by scripts/test-long.sh, not CI")
