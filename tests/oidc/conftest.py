"""The OpenID provider (tests/oidc/provider.mjs) for the people's-login tests in this directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from oidcprovider import OpenIDProvider, start_provider


@pytest.fixture(scope="session")
def openid_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenIDProvider]:
    with start_provider(tmp_path_factory.mktemp("oidc-provider")) as provider:
        yield provider
