if __name__ == "__main__":  # a spawned tokenizer process imports this module too (as __mp_main__):
    from reembed.cli import main  # only the command itself loads the CLI, and with it the library

    raise SystemExit(main())
