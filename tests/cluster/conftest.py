from tests.search.conftest import fixture_zoo  # noqa: F401  (the fixture zoo, built once per session)
