"""The secret values the test suite hands to pgdr, so tests can assert none leaks."""

from urllib.parse import quote

PG_SECRET_ROLE = "pgdr_secret"
PG_SECRET_PASSWORD = "S3cr3t-Pa55-word!"
AWS_SECRET_ACCESS_KEY = "testing-Secret-Key-Do-Not-Leak"
GPG_PASSPHRASE = "Gpg-Pa55phrase-Do-Not-Leak"

# Each secret as written, plus its percent-encoded form where that differs (URLs).
ALL_SECRETS: tuple[str, ...] = tuple(
    dict.fromkeys(
        form
        for secret in (PG_SECRET_PASSWORD, AWS_SECRET_ACCESS_KEY, GPG_PASSPHRASE)
        for form in (secret, quote(secret, safe=""))
    )
)
