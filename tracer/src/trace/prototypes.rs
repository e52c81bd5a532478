//! Prototypes of common libc functions, for tracing a library without debug info (as
//! Debian's libc is shipped).
//!
//! Each entry is `name params ret`, one letter per value: `i` int, `l` long / ssize_t /
//! off_t, `u` size_t / unsigned long, `w` unsigned int, `x` int flags (hex), `o` mode_t
//! (octal), `c` char (in an int), `p` pointer, `s` `char *` (the string is copied by the
//! agent with its fault-free read), `d` double, `v` void; `.` as the last parameter means
//! more may follow (`printf`, `open`'s optional mode is written out instead).

use super::signature::{ArgType, Param, Signature, Source};

const TABLE: &[(&str, &str, char)] = &[
    // memory
    ("malloc", "u", 'p'),
    ("calloc", "uu", 'p'),
    ("realloc", "pu", 'p'),
    ("reallocarray", "puu", 'p'),
    ("free", "p", 'v'),
    ("aligned_alloc", "uu", 'p'),
    ("memalign", "uu", 'p'),
    ("posix_memalign", "puu", 'i'),
    ("valloc", "u", 'p'),
    ("memcpy", "ppu", 'p'),
    ("memmove", "ppu", 'p'),
    ("memset", "piu", 'p'),
    ("memcmp", "ppu", 'i'),
    ("memchr", "piu", 'p'),
    ("mmap", "puxxil", 'p'),
    ("mmap64", "puxxil", 'p'),
    ("munmap", "pu", 'i'),
    ("mprotect", "pux", 'i'),
    // strings
    ("strlen", "s", 'u'),
    ("strnlen", "su", 'u'),
    ("strcmp", "ss", 'i'),
    ("strncmp", "ssu", 'i'),
    ("strcasecmp", "ss", 'i'),
    ("strncasecmp", "ssu", 'i'),
    ("strcoll", "ss", 'i'),
    ("strcpy", "ps", 'p'),
    ("strncpy", "psu", 'p'),
    ("stpcpy", "ps", 'p'),
    ("strcat", "ss", 's'),
    ("strncat", "ssu", 's'),
    ("strdup", "s", 's'),
    ("strndup", "su", 's'),
    ("strchr", "sc", 's'),
    ("strrchr", "sc", 's'),
    ("strstr", "ss", 's'),
    ("strpbrk", "ss", 's'),
    ("strspn", "ss", 'u'),
    ("strcspn", "ss", 'u'),
    ("strtok", "ss", 's'),
    ("strtok_r", "ssp", 's'),
    ("strsep", "ps", 's'),
    ("strerror", "i", 's'),
    ("strtol", "spi", 'l'),
    ("strtoul", "spi", 'u'),
    ("strtoll", "spi", 'l'),
    ("strtoull", "spi", 'u'),
    ("strtod", "sp", 'd'),
    ("atoi", "s", 'i'),
    ("atol", "s", 'l'),
    ("atof", "s", 'd'),
    ("toupper", "c", 'c'),
    ("tolower", "c", 'c'),
    ("isatty", "i", 'i'),
    // stdio
    ("puts", "s", 'i'),
    ("fputs", "sp", 'i'),
    ("putchar", "c", 'i'),
    ("fputc", "cp", 'i'),
    ("printf", "s.", 'i'),
    ("fprintf", "ps.", 'i'),
    ("dprintf", "is.", 'i'),
    ("sprintf", "ps.", 'i'),
    ("snprintf", "pus.", 'i'),
    ("vprintf", "sp", 'i'),
    ("vfprintf", "psp", 'i'),
    ("vsnprintf", "pusp", 'i'),
    ("sscanf", "ss.", 'i'),
    ("fopen", "ss", 'p'),
    ("fopen64", "ss", 'p'),
    ("fdopen", "is", 'p'),
    ("freopen", "ssp", 'p'),
    ("fclose", "p", 'i'),
    ("fflush", "p", 'i'),
    ("fread", "puup", 'u'),
    ("fwrite", "puup", 'u'),
    ("fgets", "pip", 's'),
    ("fgetc", "p", 'i'),
    ("getc", "p", 'i'),
    ("fileno", "p", 'i'),
    ("fseek", "pli", 'i'),
    ("ftell", "p", 'l'),
    ("perror", "s", 'v'),
    ("setvbuf", "ppiu", 'i'),
    // files
    ("open", "sx.", 'i'),
    ("open64", "sx.", 'i'),
    ("openat", "isx.", 'i'),
    ("openat64", "isx.", 'i'),
    ("creat", "so", 'i'),
    ("close", "i", 'i'),
    ("read", "ipu", 'l'),
    ("write", "ipu", 'l'),
    ("pread", "ipul", 'l'),
    ("pread64", "ipul", 'l'),
    ("pwrite", "ipul", 'l'),
    ("pwrite64", "ipul", 'l'),
    ("lseek", "ili", 'l'),
    ("lseek64", "ili", 'l'),
    ("dup", "i", 'i'),
    ("dup2", "ii", 'i'),
    ("pipe", "p", 'i'),
    ("fcntl", "ii.", 'i'),
    ("ioctl", "iu.", 'i'),
    ("stat", "sp", 'i'),
    ("stat64", "sp", 'i'),
    ("lstat", "sp", 'i'),
    ("lstat64", "sp", 'i'),
    ("fstat", "ip", 'i'),
    ("fstat64", "ip", 'i'),
    ("fstatat", "ispx", 'i'),
    ("fstatat64", "ispx", 'i'),
    ("statx", "isxwp", 'i'),
    ("access", "si", 'i'),
    ("faccessat", "isix", 'i'),
    ("unlink", "s", 'i'),
    ("unlinkat", "isx", 'i'),
    ("rename", "ss", 'i'),
    ("mkdir", "so", 'i'),
    ("rmdir", "s", 'i'),
    ("chdir", "s", 'i'),
    ("chmod", "so", 'i'),
    ("getcwd", "pu", 's'),
    ("realpath", "sp", 's'),
    ("readlink", "spu", 'l'),
    ("opendir", "s", 'p'),
    ("fdopendir", "i", 'p'),
    ("closedir", "p", 'i'),
    ("readdir", "p", 'p'),
    ("readdir64", "p", 'p'),
    // processes, environment
    ("getenv", "s", 's'),
    ("secure_getenv", "s", 's'),
    ("setenv", "ssi", 'i'),
    ("unsetenv", "s", 'i'),
    ("exit", "i", 'v'),
    ("_exit", "i", 'v'),
    ("abort", "", 'v'),
    ("atexit", "p", 'i'),
    ("getpid", "", 'i'),
    ("getppid", "", 'i'),
    ("gettid", "", 'i'),
    ("getuid", "", 'w'),
    ("fork", "", 'i'),
    ("vfork", "", 'i'),
    ("execve", "spp", 'i'),
    ("execv", "sp", 'i'),
    ("execvp", "sp", 'i'),
    ("system", "s", 'i'),
    ("waitpid", "ipx", 'i'),
    ("kill", "ii", 'i'),
    ("raise", "i", 'i'),
    ("signal", "ip", 'p'),
    ("sigaction", "ipp", 'i'),
    ("sleep", "w", 'w'),
    ("usleep", "w", 'i'),
    ("nanosleep", "pp", 'i'),
    ("clock_nanosleep", "ixpp", 'i'),
    ("time", "p", 'l'),
    ("clock_gettime", "ip", 'i'),
    ("gettimeofday", "pp", 'i'),
    ("sysconf", "i", 'l'),
    ("setlocale", "is", 's'),
    ("qsort", "puup", 'v'),
    ("bsearch", "ppuup", 'p'),
    ("dlopen", "sx", 'p'),
    ("dlsym", "ps", 'p'),
    ("dlclose", "p", 'i'),
    ("dlerror", "", 's'),
    // threads
    ("pthread_create", "pppp", 'i'),
    ("pthread_join", "up", 'i'),
    ("pthread_self", "", 'u'),
    ("pthread_mutex_lock", "p", 'i'),
    ("pthread_mutex_trylock", "p", 'i'),
    ("pthread_mutex_unlock", "p", 'i'),
    ("pthread_cond_wait", "pp", 'i'),
    ("pthread_cond_signal", "p", 'i'),
    ("pthread_cond_broadcast", "p", 'i'),
    // sockets
    ("socket", "iii", 'i'),
    ("connect", "ipw", 'i'),
    ("bind", "ipw", 'i'),
    ("listen", "ii", 'i'),
    ("accept", "ipp", 'i'),
    ("accept4", "ippx", 'i'),
    ("send", "ipux", 'l'),
    ("recv", "ipux", 'l'),
    ("sendto", "ipuxpw", 'l'),
    ("recvfrom", "ipuxpp", 'l'),
    ("shutdown", "ii", 'i'),
    ("poll", "pwi", 'i'),
    ("select", "ipppp", 'i'),
    ("epoll_wait", "ipii", 'i'),
    ("getaddrinfo", "sspp", 'i'),
    // maths
    ("sqrt", "d", 'd'),
    ("sin", "d", 'd'),
    ("cos", "d", 'd'),
    ("exp", "d", 'd'),
    ("log", "d", 'd'),
    ("pow", "dd", 'd'),
    ("floor", "d", 'd'),
    ("ceil", "d", 'd'),
];

fn ty(c: char) -> Option<ArgType> {
    Some(match c {
        'i' => ArgType::Signed(4),
        'l' => ArgType::Signed(8),
        'u' => ArgType::Unsigned(8),
        'w' => ArgType::Unsigned(4),
        'x' => ArgType::Hex,
        'o' => ArgType::Octal,
        'c' => ArgType::Char,
        'p' => ArgType::Pointer,
        's' => ArgType::Str,
        'd' => ArgType::F64,
        'v' => ArgType::Void,
        _ => return None,
    })
}

/// The shipped prototype of libc function `name` (a symbol, version suffix allowed).
pub fn lookup(name: &str) -> Option<Signature> {
    let name = name.split('@').next().unwrap_or(name);
    // glibc's aliases: `__libc_malloc`, `__open64`, `__GI___strlen`.
    let bare = name
        .strip_prefix("__GI_")
        .unwrap_or(name)
        .trim_start_matches('_');
    let bare = bare.strip_prefix("libc_").unwrap_or(bare);
    let &(_, params, ret) = TABLE
        .iter()
        .find(|(n, _, _)| *n == name)
        .or_else(|| TABLE.iter().find(|(n, _, _)| *n == bare))?;
    let variadic = params.ends_with('.');
    let params = params
        .trim_end_matches('.')
        .chars()
        .map(|c| ty(c).map(|ty| Param { name: None, ty }))
        .collect::<Option<Vec<_>>>()?;
    Some(Signature {
        params,
        ret: ty(ret)?,
        variadic,
        source: Source::Prototype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_parses_and_names_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (name, _, _) in TABLE {
            assert!(seen.insert(*name), "{name} twice");
            assert!(lookup(name).is_some(), "{name} does not parse");
        }
    }

    #[test]
    fn aliases_and_versions_find_the_prototype() {
        let open = lookup("__open64@@GLIBC_2.2.5").expect("open64");
        assert_eq!(open.params[0].ty, ArgType::Str);
        assert_eq!(open.string_mask(), 1);
        assert_eq!(
            lookup("__libc_malloc").expect("malloc").ret,
            ArgType::Pointer
        );
        assert!(lookup("printf").expect("printf").variadic);
        assert!(lookup("no_such_function").is_none());
    }
}
