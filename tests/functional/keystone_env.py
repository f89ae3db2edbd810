"""The Keystone v3 the Keystone tests use, from the environment.

``scripts/test`` starts a Keystone on loopback and a Swift whose proxy
checks its tokens (authtoken + keystoneauth) and exports these variables;
any Keystone and Swift set up alike will do:

=====================================  =======================================
``SHOEBOX_TEST_OS_AUTH_URL``           Keystone's v3 URL (``.../v3``)
``SHOEBOX_TEST_OS_USERNAME``,          a user with an operator role of the
``SHOEBOX_TEST_OS_PASSWORD``           proxy's keystoneauth in the project
``SHOEBOX_TEST_OS_PROJECT_NAME``       the project (its Swift account)
``SHOEBOX_TEST_OS_USER_DOMAIN_NAME``,  their domains (e.g. ``Default``)
``SHOEBOX_TEST_OS_PROJECT_DOMAIN_NAME``
``SHOEBOX_TEST_OS_REGION_NAME``        the region of the object-store
                                       endpoint in the catalog
``SHOEBOX_TEST_KS_NOROLE_USERNAME``,   a user of the same domain with a role
``SHOEBOX_TEST_KS_NOROLE_PASSWORD``    in the project that is not an
                                       operator role (so Swift answers 403)
``SHOEBOX_TEST_KS_TOKEN_EXPIRATION``   Keystone's ``[token] expiration``, in
                                       seconds: at most 90
=====================================  =======================================

Unset, the tests are skipped (they fail when ``CI=true``).
"""

import os

import pytest

VARS = {
    "os_auth_url": "SHOEBOX_TEST_OS_AUTH_URL",
    "os_username": "SHOEBOX_TEST_OS_USERNAME",
    "os_password": "SHOEBOX_TEST_OS_PASSWORD",
    "os_project_name": "SHOEBOX_TEST_OS_PROJECT_NAME",
    "os_user_domain_name": "SHOEBOX_TEST_OS_USER_DOMAIN_NAME",
    "os_project_domain_name": "SHOEBOX_TEST_OS_PROJECT_DOMAIN_NAME",
    "os_region_name": "SHOEBOX_TEST_OS_REGION_NAME",
    "norole_username": "SHOEBOX_TEST_KS_NOROLE_USERNAME",
    "norole_password": "SHOEBOX_TEST_KS_NOROLE_PASSWORD",
    "token_expiration": "SHOEBOX_TEST_KS_TOKEN_EXPIRATION",
}
#: Longer token lifetimes would make the tests too slow.
MAX_TOKEN_EXPIRATION = 90


def unavailable(message):
    """Skip, or fail when CI=true: CI must not pass by skipping."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


class KeystoneEnv:
    """The settings, and the ``[callback:swift]`` options made of them."""

    def __init__(self, values):
        self.values = values
        self.token_expiration = float(values["token_expiration"])

    def swift_options(self, **overrides):
        """``[callback:swift]`` options for the operator user."""
        options = {name: value for name, value in self.values.items()
                   if name.startswith("os_")}
        return dict(options, **overrides)

    def norole_options(self, **overrides):
        return self.swift_options(
            os_username=self.values["norole_username"],
            os_password=self.values["norole_password"], **overrides)

    @property
    def secrets(self):
        return (self.values["os_password"], self.values["norole_password"])


def keystone_env():
    """The settings from the environment, or skip (fail under CI)."""
    missing = [var for var in VARS.values() if not os.environ.get(var)]
    if missing:
        unavailable("Keystone tests: %s not set (scripts/test exports them "
                    "when it starts Keystone)" % ", ".join(missing))
    values = {name: os.environ[var] for name, var in VARS.items()}
    try:
        expiration = float(values["token_expiration"])
    except ValueError:
        pytest.fail("SHOEBOX_TEST_KS_TOKEN_EXPIRATION: expected seconds, "
                    "got %r" % values["token_expiration"])
    if not 0 < expiration <= MAX_TOKEN_EXPIRATION:
        pytest.fail("SHOEBOX_TEST_KS_TOKEN_EXPIRATION=%s: the tests need a "
                    "token lifetime of at most %d s"
                    % (values["token_expiration"], MAX_TOKEN_EXPIRATION))
    return KeystoneEnv(values)
