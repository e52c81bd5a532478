//! Attribute macros of probe packs, re-exported by `probes`.
//!
//! Each handler attribute keeps the function as written and adds an `extern "C"` shim,
//! exported as `__tracer_probe_<name>`, that runs it under `catch_unwind`, plus a
//! descriptor in the `tracer_pack` section naming the shim and the spec. `#[map]` exports
//! a pointer to the handle as `__tracer_map_<NAME>` (the agent binds the handle to shared
//! storage through it) and adds a descriptor with the map's kind and parameters. Two
//! handlers or maps of one name in different modules of a pack collide at link time. Descriptors hold no pointer: the tracer
//! reads them from the ELF file before injecting anything.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote, ToTokens};
use syn::{parse_macro_input, Error, FnArg, ItemFn, ItemStatic, LitStr, StaticMutability};

/// Run the function at each entry of the functions SPEC matches: `#[entry("libc:malloc")]`,
/// `fn f(ctx: &mut EntryCtx)`.
#[proc_macro_attribute]
pub fn entry(attr: TokenStream, item: TokenStream) -> TokenStream {
    handler(Kind::Entry, attr, item)
}

/// Run the function when the functions SPEC matches return: `fn f(ctx: &mut ExitCtx)`.
#[proc_macro_attribute]
pub fn exit(attr: TokenStream, item: TokenStream) -> TokenStream {
    handler(Kind::Exit, attr, item)
}

/// Run the function at an instruction, `SYMBOL+OFFSET`, with every register:
/// `fn f(ctx: &mut FullCtx)`.
#[proc_macro_attribute]
pub fn at(attr: TokenStream, item: TokenStream) -> TokenStream {
    handler(Kind::At, attr, item)
}

/// Declare a map the tracer prints at the end: `#[map] static SIZES: Histogram =
/// Histogram::log2();`.
#[proc_macro_attribute]
pub fn map(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return Error::new(Span::call_site(), "#[map] takes no arguments")
            .to_compile_error()
            .into();
    }
    let item = parse_macro_input!(item as ItemStatic);
    match map_impl(item) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Entry,
    Exit,
    At,
}

fn handler(kind: Kind, attr: TokenStream, item: TokenStream) -> TokenStream {
    let spec = parse_macro_input!(attr as LitStr);
    let f = parse_macro_input!(item as ItemFn);
    match handler_impl(kind, spec, f) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// The checks the CLI's spec parser makes that can be made here; the tracer parses the
/// spec again when it reads the pack.
fn check_spec(kind: Kind, spec: &LitStr) -> syn::Result<()> {
    let s = spec.value();
    let bad = |m: &str| Err(Error::new(spec.span(), format!("probe spec {s:?}: {m}")));
    if s.is_empty() {
        return bad("empty; write [MODULE:]SYMBOL[+OFFSET], e.g. \"libc:malloc\"");
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains whitespace");
    }
    if s.matches(':').count() > 1 {
        return bad("more than one ':'");
    }
    if kind != Kind::At && s.contains('+') {
        return bad("an offset needs #[at(...)], which sees every register");
    }
    if s.len() > 256 {
        return bad("longer than 256 bytes");
    }
    Ok(())
}

fn handler_impl(kind: Kind, spec: LitStr, f: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    check_spec(kind, &spec)?;
    let name = &f.sig.ident;
    if f.sig.inputs.len() != 1 || matches!(f.sig.inputs.first(), Some(FnArg::Receiver(_))) {
        let want = match kind {
            Kind::Entry => "ctx: &mut EntryCtx",
            Kind::Exit => "ctx: &mut ExitCtx",
            Kind::At => "ctx: &mut FullCtx",
        };
        return Err(Error::new_spanned(
            &f.sig,
            format!("a probe handler takes one argument, `{want}`"),
        ));
    }
    if name.to_string().len() > 64 - "__tracer_probe_".len() {
        return Err(Error::new_spanned(
            name,
            "handler name too long for its descriptor (49 bytes)",
        ));
    }
    let shim = format_ident!("__tracer_probe_{}", name);
    let shim_name = shim.to_string();
    let desc = format_ident!("__TRACER_DESC_{}", name);
    let name_str = name.to_string();
    // probe_flags: NO_TIME, and for entry handlers NO_FLOATS.
    let mut flags = 0u64;
    if !ctx_uses(&f, &["elapsed_ns", "regs"]) {
        flags |= 1;
    }
    if kind == Kind::Entry && !ctx_uses(&f, FLOAT_METHODS) {
        flags |= 2;
    }
    let (run, kind_const) = match kind {
        Kind::Entry => (quote!(run_entry), quote!(ENTRY)),
        Kind::Exit => (quote!(run_exit), quote!(EXIT)),
        Kind::At => (quote!(run_at), quote!(AT)),
    };
    Ok(quote! {
        #f

        #[doc(hidden)]
        #[unsafe(export_name = #shim_name)]
        pub unsafe extern "C" fn #shim(
            ctx: *mut u8,
            hit: *const ::probes::pack::abi::HitInfo,
        ) -> u32 {
            // SAFETY: the agent calls shims with the context of the descriptor's kind.
            unsafe { ::probes::pack::shim::#run(ctx, hit, #name) }
        }

        #[doc(hidden)]
        #[used]
        #[allow(non_upper_case_globals)]
        #[unsafe(link_section = "tracer_pack")]
        static #desc: ::probes::pack::abi::Descriptor = ::probes::pack::abi::Descriptor::probe(
            ::probes::pack::abi::probe_kind::#kind_const,
            #name_str,
            #spec,
            #flags,
        );
    })
}

/// Methods of `EntryCtx` that read or write the float arguments.
const FLOAT_METHODS: &[&str] = &[
    "float_arg",
    "float_arg_f32",
    "set_float_arg",
    "set_float_arg_f32",
    "regs",
];

/// Whether the handler may call one of `methods` on its context argument: false only
/// when the argument is used for nothing but calls of other methods, or not at all. Any
/// other use (passed to a function, moved, borrowed) counts as calling them. The body's
/// tokens are scanned, macro arguments included; a macro defined elsewhere cannot name
/// the argument unless given it (hygiene), so nothing escapes the scan.
fn ctx_uses(f: &ItemFn, methods: &[&str]) -> bool {
    let Some(FnArg::Typed(arg)) = f.sig.inputs.first() else {
        return true;
    };
    let name = match &*arg.pat {
        syn::Pat::Ident(p) => p.ident.to_string(),
        syn::Pat::Wild(_) => return false,
        _ => return true,
    };
    let body = f.block.to_token_stream();
    uses(body, &name, methods)
}

fn uses(tokens: proc_macro2::TokenStream, name: &str, methods: &[&str]) -> bool {
    use proc_macro2::TokenTree;
    let toks: Vec<TokenTree> = tokens.into_iter().collect();
    for (k, t) in toks.iter().enumerate() {
        match t {
            TokenTree::Group(g) if uses(g.stream(), name, methods) => return true,
            TokenTree::Ident(i) if i == name => {
                let dot =
                    matches!(toks.get(k + 1), Some(TokenTree::Punct(p)) if p.as_char() == '.');
                let method = match toks.get(k + 2) {
                    Some(TokenTree::Ident(m)) => m.to_string(),
                    _ => return true,
                };
                if !dot || methods.contains(&method.as_str()) {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

fn map_impl(s: ItemStatic) -> syn::Result<proc_macro2::TokenStream> {
    if !matches!(s.mutability, StaticMutability::None) {
        return Err(Error::new_spanned(
            &s.ident,
            "a #[map] static cannot be `mut`: maps update through shared references",
        ));
    }
    let ItemStatic {
        attrs,
        vis,
        ident,
        ty,
        expr,
        ..
    } = &s;
    let name = ident.to_string();
    if name.len() > 64 - "__tracer_map_".len() {
        return Err(Error::new_spanned(
            ident,
            "map name too long for its descriptor (51 bytes)",
        ));
    }
    let export = format!("__tracer_map_{name}");
    let export_ident = format_ident!("__TRACER_MAP_EXPORT_{}", ident);
    let desc = format_ident!("__TRACER_MAP_DESC_{}", ident);
    Ok(quote! {
        #(#attrs)*
        #vis static #ident: #ty = #expr;

        // The agent finds the handle through this exported pointer. The handle itself is
        // not exported: an exported symbol is reached through the GOT and could be
        // interposed by a same-named symbol of the target, sending updates elsewhere.
        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        #[unsafe(export_name = #export)]
        static #export_ident: &#ty = &#ident;

        #[doc(hidden)]
        #[used]
        #[allow(non_upper_case_globals)]
        #[unsafe(link_section = "tracer_pack")]
        static #desc: ::probes::pack::abi::Descriptor = {
            // The initializer again, as a const: a static's value cannot be read at
            // compile time, a const's can.
            const INIT: #ty = #expr;
            ::probes::pack::abi::Descriptor::map(#name, INIT.map_kind(), INIT.map_params())
        };
    })
}
