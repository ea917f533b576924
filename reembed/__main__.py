from reembed.cli import main

if __name__ == "__main__":  # a spawned tokenizer process imports this module too
    raise SystemExit(main())
