"""Entry script of the single-file binary (see moechat.spec): the ``moechat`` command."""

from moechat.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
